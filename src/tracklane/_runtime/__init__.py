"""Process glue for the synchronous face: the loop thread, exit flush, signals, fork."""
