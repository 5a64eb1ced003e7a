from distft.privacy import PRIVACY
from distft.privacy.base import Privacy


@PRIVACY.register("none")
class NoPrivacy(Privacy):
    """Ordinary training: no noise, no per-sample clipping."""

    def load_state_dict(self, state):
        if state:
            from distft.errors import ConfigError

            raise ConfigError(f"the checkpoint was written with privacy={state.get('name', 'dp')}; resuming it "
                              "without would train on with other settings than its accounting assumes; "
                              "resume with the same privacy settings")
