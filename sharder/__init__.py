"""podtrain: sharder."""
