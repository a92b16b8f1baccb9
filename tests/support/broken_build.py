"""A module whose import raises RuntimeError, as one importing a broken build of a library does
(torchvision compiled against another torch: `RuntimeError: operator torchvision::nms does not exist`)."""

raise RuntimeError("operator torchvision::nms does not exist\n(a second line the one-line error leaves out)")
