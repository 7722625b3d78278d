"""Pure Array-API building blocks shared by every backend."""
