"""The mmkit command line: click commands that parse, call the API and print."""
