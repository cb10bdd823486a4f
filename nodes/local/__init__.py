"""The local federation (several nodes on one machine) and the demo."""
