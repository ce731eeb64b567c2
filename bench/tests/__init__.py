"""Tests of the bench and chaos harnesses' pure parts (``make test`` runs them with tests/)."""
