"""emotion-omni-kit library."""
