"""podtrain: orchestrator."""
