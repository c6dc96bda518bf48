"""kdprune-report: records found and read (collect), their numbers (stats), tables (tables), plots, the CLI."""
