"""Training the teacher and distilling the network of students (SPEC.md §6). Needs torch (`train` extra)."""
