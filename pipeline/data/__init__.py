"""The project's data: QA records, their schema and checks, feedback export."""
