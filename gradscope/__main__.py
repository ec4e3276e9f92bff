"""`python -m gradscope` is the `gradscope` command."""
from gradscope.cli import main

main()
