"""podtrain: training."""
