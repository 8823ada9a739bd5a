"""Train, track and serve sub-5M-parameter ResNets on CIFAR-10."""

import os

# Albumentations looks for updates online at import; there is often no network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
