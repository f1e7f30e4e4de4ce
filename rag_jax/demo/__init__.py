"""The built-in demo: a generated fictional world (``world``) and the staged run over it (``run``)."""
