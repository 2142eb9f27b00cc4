"""Measuring methods: runs and their records (`compare`, `records`), the versioned results file (`results`), the
table (`leaderboard`), the resumable sweep and its cell store (`sweep`, `cells`), timings (`bench`) and plots."""
