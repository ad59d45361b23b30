"""Every git access: the ``git`` command and config (``commands``) and the object reader
(``objects``); no module outside this package builds a git argv.
"""
