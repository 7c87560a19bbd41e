"""MobileMoE recipe: the importable library. Importing it has no side effects."""
