"""What a run leaves on disk, and how folders from anywhere are read back without trusting them."""
