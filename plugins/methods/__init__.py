"""Built-in merge methods; a method made of several modules is a package of its own."""
