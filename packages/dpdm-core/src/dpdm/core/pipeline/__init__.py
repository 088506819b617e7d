"""A recipe end to end: build what it names, check it, train the teacher and the student, evaluate, and write
the run directory."""
