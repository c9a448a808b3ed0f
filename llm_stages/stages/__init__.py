"""One LightningModule per stage, each readable top to bottom; shared machinery in base.py."""
