from dptrain.cli import main

main()
