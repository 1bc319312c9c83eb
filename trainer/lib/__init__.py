"""What the stage scripts share, one concern per module (see docs/ARCHITECTURE.md for the map)."""
