"""Story tests: whole training runs, resumes and the examples, end to end."""
