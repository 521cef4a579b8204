"""Typed messages and the array codec: the only place the coordinator and silos meet."""
