"""ImageNet linear classification and kNN tasks (issue 5)."""
