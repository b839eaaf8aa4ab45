"""Values shared by the data side and the loss side of the batch contract."""

IGNORE_INDEX = -100  # label of a position that carries no loss (the value PyTorch's cross_entropy ignores)
NO_TASK = -1  # task id and segment id of padding positions
