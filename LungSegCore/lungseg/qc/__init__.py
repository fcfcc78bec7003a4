"""Quality control: rules, the predicted quality of each result, and the offline fit of its model."""
