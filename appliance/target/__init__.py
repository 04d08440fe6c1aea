"""The master target: applies replicated changes to replica disks and keeps recovery points."""
