"""Scoring answers: metric functions, the evaluation loop, and the report."""
