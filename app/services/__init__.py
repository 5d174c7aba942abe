"""Domain services: plain functions for each stage of the loop (prompt import, sampling, labeling, export, training)."""
