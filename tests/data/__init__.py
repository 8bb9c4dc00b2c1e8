"""Tests of pico.data."""
