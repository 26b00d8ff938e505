"""The segmentation labels every part of fedefm shares: a mask pixel is an index into LABEL_NAMES."""

LABEL_NAMES: tuple[str, ...] = ("background", "catheter", "guidewire")
# The foreground labels: what the metrics score and the tables report.
DEVICE_LABELS: tuple[str, ...] = LABEL_NAMES[1:]
