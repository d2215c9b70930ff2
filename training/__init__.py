"""Training and evaluation of the emotion model served by ``worker``."""
