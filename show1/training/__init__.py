"""Training: one trainer for every stage; stages differ only by how a clip becomes (input, condition, target)."""
