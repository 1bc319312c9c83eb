"""Stage scripts (train_<N>_<stage>.py, in course order) and the plumbing they share."""
