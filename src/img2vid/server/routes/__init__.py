"""The app's routes, one APIRouter per area: health, model, jobs and the web page."""
