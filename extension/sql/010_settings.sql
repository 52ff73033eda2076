-- Settings: one typed, range-checked row per knob (table booking_guard.settings).
--
-- Each row holds its value in the column of its kind, so the hot paths (triggers) read a real
-- interval or boolean without casting text, and CHECK constraints keep even a direct UPDATE from
-- storing a value out of range. set_setting() is the way in.

-- Seeded configuration tables (settings, rules, ...) are dumped by pg_dump and restored with COPY
-- after CREATE EXTENSION has seeded them again. A restored row would then collide with its freshly
-- seeded twin; this trigger lets the restored (user's) row replace the seeded one.
create function booking_guard_internal.replace_seeded_row()
returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
declare
    key_column text := tg_argv[0];
begin
    execute format('delete from %I.%I where %I::text = $1', tg_table_schema, tg_table_name, key_column)
        using to_jsonb(new) ->> key_column;
    return new;
end
$$;

comment on function booking_guard_internal.replace_seeded_row() is
    'Trigger: an INSERT of an existing key replaces the row, so that pg_restore of a seeded config table keeps the dumped values.';

create trigger settings_replace_seeded_row
    before insert on booking_guard.settings
    for each row execute function booking_guard_internal.replace_seeded_row('name');

create function booking_guard.setting(setting_name text)
returns text
language sql
stable
set search_path = pg_catalog, pg_temp
as $$
    select coalesce(s.interval_value::text, s.integer_value::text, s.numeric_value::text,
                    s.text_value, s.boolean_value::text)
      from booking_guard.settings s
     where s.name = setting_name
$$;

comment on function booking_guard.setting(text) is
    'The current value of a setting, as text; null for an unknown name (set_setting() is the strict one).';

create function booking_guard.set_setting(setting_name text, new_value text)
returns text
language plpgsql
security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    s              booking_guard.settings;
    v_interval     interval;
    v_integer      bigint;
    v_numeric      numeric;
    v_boolean      boolean;
    v_measure      numeric;
    v_unit         text := '';
begin
    select * into s from booking_guard.settings where name = setting_name for update;
    if not found then
        raise exception 'unknown setting "%"', setting_name
            using errcode = 'BG004',
                  detail = format('Known settings: %s.',
                                  (select string_agg(name, ', ' order by name) from booking_guard.settings)),
                  hint = 'select name, kind, description from booking_guard.settings;';
    end if;
    if new_value is null then
        raise exception 'setting "%" cannot be set to null', setting_name
            using errcode = 'BG005',
                  detail = format('"%s" is a setting of kind %s.', setting_name, s.kind),
                  hint = format('Give a %s value.', s.kind);
    end if;

    begin
        case s.kind
            when 'interval' then
                v_interval := new_value::interval;
                v_measure := extract(epoch from v_interval);
                v_unit := ' seconds';
            when 'integer' then
                v_integer := new_value::bigint;
                v_measure := v_integer;
            when 'numeric' then
                v_numeric := new_value::numeric;
                v_measure := v_numeric;
            when 'boolean' then
                v_boolean := new_value::boolean;
            else
                null;
        end case;
    exception when data_exception then
        raise exception 'invalid value for setting "%": "%" is not a valid %', setting_name, new_value, s.kind
            using errcode = 'BG005',
                  detail = format('The server said: %s', sqlerrm),
                  hint = case s.kind
                             when 'interval' then 'Write an interval, e.g. ''5 seconds'' or ''2 minutes''.'
                             when 'boolean' then 'Write true or false.'
                             else format('Write a %s.', s.kind)
                         end;
    end;

    if v_measure < coalesce(s.min_value, '-Infinity') or v_measure > coalesce(s.max_value, 'Infinity') then
        raise exception 'value out of range for setting "%": %', setting_name, new_value
            using errcode = 'BG005',
                  detail = format('"%s" must be between %s and %s%s; %s is %s%s.', setting_name,
                                  coalesce(s.min_value::text, '-infinity'), coalesce(s.max_value::text, 'infinity'),
                                  v_unit, new_value, trim_scale(v_measure), v_unit),
                  hint = format('Choose a value in [%s, %s]%s.', coalesce(s.min_value::text, '-infinity'),
                                coalesce(s.max_value::text, 'infinity'), v_unit);
    end if;
    if s.kind = 'text' and s.allowed_values is not null and not new_value = any (s.allowed_values) then
        raise exception 'invalid value for setting "%": "%"', setting_name, new_value
            using errcode = 'BG005',
                  detail = format('Allowed values: %s.', array_to_string(s.allowed_values, ', ')),
                  hint = format('Choose one of: %s.', array_to_string(s.allowed_values, ', '));
    end if;

    update booking_guard.settings
       set interval_value = v_interval,
           integer_value = v_integer,
           numeric_value = v_numeric,
           text_value = case when s.kind = 'text' then new_value end,
           boolean_value = v_boolean,
           updated_at = now(),
           updated_by = session_user
     where name = setting_name;
    return booking_guard.setting(setting_name);
end
$$;

comment on function booking_guard.set_setting(text, text) is
    'Changes a setting; an unknown name (BG004), a value of the wrong kind or out of range (BG005) is an error and writes nothing.';
