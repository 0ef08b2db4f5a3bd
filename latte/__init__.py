"""Latte at cluster scale."""
