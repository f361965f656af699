"""Imported last by the local workers' fork server: what the imports made is frozen out of
later collections (in the server and in every worker it forks), and collection resumes.
"""

from flows.startup import resume_collection

resume_collection()
