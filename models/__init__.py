"""Models: preprocessing shared by prepare, training and serving."""
