"""Tests of cellseg_deploy.bench and the bench command."""
