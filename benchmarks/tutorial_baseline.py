"""The baseline: MNIST trained the way most tutorials show it.

torchvision's MNIST dataset, per-sample ToTensor and Normalize transforms, a DataLoader, and a
plain loop. Same network (784-16-16-10, ReLU), loss (cross-entropy), optimizer (Adam, lr 0.01)
and batch (1024) as `dptrain seq`, over the same number of samples per epoch (42,000).

    python benchmarks/tutorial_baseline.py --root DIR --workers 0 --epochs 1

DIR must hold torchvision's layout (DIR/MNIST/raw/train-images-idx3-ubyte, ...); bench.py
prepares it from the gz files. Prints one JSON line: seconds per epoch, and accuracy.
"""

import argparse
import json
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

parser = argparse.ArgumentParser()
parser.add_argument("--root", required=True)
parser.add_argument("--workers", type=int, default=0)
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
train_set = datasets.MNIST(args.root, train=True, download=False, transform=transform)
train_set = Subset(train_set, range(42_000))
loader = DataLoader(train_set, batch_size=1024, shuffle=True, drop_last=True,
                    num_workers=args.workers)

model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 10))
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

epoch_seconds = []
for epoch in range(args.epochs):
    start = time.perf_counter()
    correct = 0
    for images, labels in loader:
        optimizer.zero_grad()
        outputs = model(images)
        loss = loss_fn(outputs, labels)
        loss.backward()
        optimizer.step()
        correct += (outputs.argmax(1) == labels).sum().item()
    epoch_seconds.append(time.perf_counter() - start)
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}, {epoch_seconds[-1]:.2f} s", flush=True)

print(json.dumps({"workers": args.workers, "epoch_seconds": epoch_seconds,
                  "train_accuracy_last_epoch": correct / (len(loader) * 1024)}))
