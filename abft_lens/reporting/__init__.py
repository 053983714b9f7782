"""Reporting: before/after comparison, figures, the HTML report, tables, export."""
