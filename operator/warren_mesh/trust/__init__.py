"""The trust boundary: what makes a record, flag or custom resource from outside valid, and why one is refused."""
