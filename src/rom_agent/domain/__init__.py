"""The bottom of the import graph: the types every layer shares and the events protocol the
core reports to. Imports nothing from the rest of the package."""
