"""One module per kernel family: checks, fake implementations, autograd."""
