"""Data the app generates or ships: the demo dataset and the bundled template."""
