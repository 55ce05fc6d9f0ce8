"""Operating a published model: the `pox` command, site validation, drift reports, the team server.
"""
