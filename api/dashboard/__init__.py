"""The job-status dashboard's own helpers: session cookie, CSRF tokens, sign-in, view models, the new-job form."""
