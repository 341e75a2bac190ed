"""Host input pipeline and on-device augmentation."""
