"""Pictures and pages for people: result grids as PNG and self-contained HTML."""
