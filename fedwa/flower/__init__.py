"""Flower plumbing: records and arrays, the reply guard, the Grid wrapper, the round loop and the
in-process (``local``) backend. Knows Flower and the math below it, not the apps."""
